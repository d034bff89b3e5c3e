-- A node with a retry policy runs once per attempt, each a step of its own in the chain of work: which
-- attempt a row is, of how many (NULL for nodes without a policy). Adding nullable columns takes no
-- table rewrite, and projectors of the previous release keep writing their rows meanwhile.
ALTER TABLE node_runs
    ADD COLUMN attempt      integer,
    ADD COLUMN max_attempts integer;
