-- API keys per client (stored as SHA-256 of the key: keys are random, so a slow hash adds nothing)
-- and per-client credentials encrypted at rest (Fernet, key from NOVA_SECRETS_KEY).
CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    client_slug text NOT NULL REFERENCES clients (slug),
    key_hash    text NOT NULL UNIQUE,
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_client_idx ON api_keys (client_slug) WHERE revoked_at IS NULL;

CREATE TABLE client_credentials (
    client_slug text NOT NULL REFERENCES clients (slug),
    name        text NOT NULL,
    ciphertext  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_slug, name)
);
