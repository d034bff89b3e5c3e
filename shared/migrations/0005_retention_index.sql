-- The retention cleanup (shared/retention.py) looks for finished executions by the time of their last
-- event, oldest first; without this index each of its batches would scan the whole table.
CREATE INDEX executions_retention_idx ON executions (updated_at)
    WHERE status IN ('completed', 'failed', 'dead', 'cancelled');
