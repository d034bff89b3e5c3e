-- Clients, workflows, executions and the chain of work (one row per node run).
CREATE TABLE clients (
    slug        text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workflows (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL,
    description text,
    definition  jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Written only by the projector, from results-stream events. (last_event_ms, last_event_seq) is the
-- stream id of the newest event applied: an upsert applies only newer events, so replaying an event
-- or applying two out of order leaves the row as the newest event made it.
CREATE TABLE executions (
    id              bigint PRIMARY KEY,
    task_id         text NOT NULL UNIQUE,
    workflow_id     bigint NOT NULL REFERENCES workflows (id),
    workflow_name   text,
    client_slug     text NOT NULL REFERENCES clients (slug),
    status          text NOT NULL,
    initial_context jsonb,
    final_context   jsonb,
    error           jsonb,
    nodes_executed  integer NOT NULL DEFAULT 0,
    current_node    text,
    attempt         integer NOT NULL DEFAULT 0,
    consumer        text,
    enqueued_at     timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_event_ms   bigint NOT NULL,
    last_event_seq  bigint NOT NULL
);
CREATE INDEX executions_workflow_idx ON executions (workflow_id, id DESC);
CREATE INDEX executions_client_idx ON executions (client_slug, id DESC);
CREATE INDEX executions_status_idx ON executions (status);

-- step is the node run's position in the execution's chain (1, 2, ...): stable across a re-delivery
-- that resumes a run, so a re-run node overwrites its own row instead of adding one.
CREATE TABLE node_runs (
    execution_id    bigint NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    step            integer NOT NULL,
    node_id         text NOT NULL,
    node_type       text NOT NULL,
    status          text NOT NULL,
    input_context   jsonb,
    output_context  jsonb,
    stdout          text,
    stderr          text,
    decision        boolean,
    next_node       text,
    error           jsonb,
    started_at      timestamptz,
    finished_at     timestamptz,
    duration_ms     double precision,
    last_event_ms   bigint NOT NULL,
    last_event_seq  bigint NOT NULL,
    PRIMARY KEY (execution_id, step)
);
