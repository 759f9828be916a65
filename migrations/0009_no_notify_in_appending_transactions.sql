-- No NOTIFY inside the appending transaction: PostgreSQL serialises the
-- commits of notifying transactions (a cluster-wide lock from commit until
-- the commit record is flushed), which capped the write path at a few
-- writers. The store wakes the relays after its commits instead (a
-- coalesced NOTIFY of its own), and the relays poll, faster after a wake.
DROP TRIGGER IF EXISTS tidings_outbox_notify ON tidings_outbox;
DROP FUNCTION IF EXISTS tidings_outbox_notify();
