-- The relay builds each message's headers (event_type, event_version,
-- event_id, aggregate_type) from plain columns instead of a JSONB document
-- per row: cheaper to write in the append and to read in the relay.
-- `headers` stays for rows written before this migration; new rows leave it
-- NULL. Adding nullable columns without a default rewrites nothing.
ALTER TABLE tidings_outbox
    ADD COLUMN event_type    TEXT,
    ADD COLUMN event_version INTEGER,
    ALTER COLUMN headers DROP NOT NULL;
