-- Workflows become versioned and deletable, with names unique among live workflows; executions record
-- the version they ran and use NOVA's status words; a decision's outcome may be a label, not only a bool.

-- The workflows row is the current version (and the workflow's identity); every version, the current
-- one included, is also in workflow_versions, where an execution finds the one it was queued with.
ALTER TABLE workflows
    ADD COLUMN version    integer NOT NULL DEFAULT 1,
    ADD COLUMN updated_at timestamptz,
    ADD COLUMN deleted_at timestamptz;
UPDATE workflows SET updated_at = created_at;
ALTER TABLE workflows
    ALTER COLUMN updated_at SET NOT NULL,
    ALTER COLUMN updated_at SET DEFAULT now();

CREATE TABLE workflow_versions (
    workflow_id bigint NOT NULL REFERENCES workflows (id),
    version     integer NOT NULL,
    name        text NOT NULL,
    description text,
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version)
);
INSERT INTO workflow_versions (workflow_id, version, name, description, definition, created_at)
SELECT id, 1, name, description, definition, created_at FROM workflows;

-- Duplicate names were allowed until now: every workflow but the oldest of a name gets the suffix
-- " #<id>", so all stay readable and executable under their ids, and the unique index can be built.
DO $$
DECLARE
    dup record;
    renamed text;
BEGIN
    FOR dup IN
        SELECT id, name FROM (
            SELECT id, name, row_number() OVER (PARTITION BY name ORDER BY id) AS nth FROM workflows
        ) ranked
        WHERE nth > 1 ORDER BY id
    LOOP
        renamed := dup.name || ' #' || dup.id;
        WHILE EXISTS (SELECT 1 FROM workflows WHERE name = renamed) LOOP
            renamed := renamed || '-' || dup.id;
        END LOOP;
        UPDATE workflows SET name = renamed WHERE id = dup.id;
        UPDATE workflow_versions SET name = renamed WHERE workflow_id = dup.id;
        RAISE NOTICE 'workflow % renamed from "%" to "%": workflow names are now unique', dup.id, dup.name, renamed;
    END LOOP;
END
$$;
CREATE UNIQUE INDEX workflows_live_name_idx ON workflows (name) WHERE deleted_at IS NULL;

-- Executions: the version they were queued with (every workflow had only version 1 until now).
ALTER TABLE executions ADD COLUMN workflow_version integer;
UPDATE executions SET workflow_version = 1;

-- NOVA's words for execution statuses (shared/streams.py, EXECUTION_STATUS_BY_EVENT).
UPDATE executions SET status = CASE status
        WHEN 'queued' THEN 'pending'
        WHEN 'success' THEN 'completed'
        WHEN 'failure' THEN 'failed'
    END
WHERE status IN ('queued', 'success', 'failure');

-- NOVA's decisions may answer a label ("approve") as well as a boolean.
ALTER TABLE node_runs ALTER COLUMN decision TYPE jsonb USING to_jsonb(decision);
