-- The outbox is a queue: every row is inserted once and deleted soon after.
-- With the default scale factors autovacuum waits for 20 % of the table to
-- be dead, and a read walks through every deleted row at the head of its
-- lanes until then. Vacuum and analyze after every 10k changed rows,
-- whatever the table's size, so the dead head stays short and the planner's
-- picture of the lanes stays current.
ALTER TABLE tidings_outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
