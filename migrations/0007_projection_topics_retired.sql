-- The topics a projection reads, recorded when a runner registers it: its
-- status shows the lag of every one of them, including topics it has never
-- been delivered a message from (no checkpoint yet).
ALTER TABLE tidings_projections ADD COLUMN topics TEXT[] NOT NULL DEFAULT '{}';

-- A projection retired when readers were switched to its new version: its
-- runners stop, and the name is not registered again by accident.
ALTER TABLE tidings_projections ADD COLUMN retired_at TIMESTAMPTZ;
