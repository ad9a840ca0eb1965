-- The highest event id pruned so far: a client resuming from an older id has lost events
-- and must resync; gaps in the numbering alone (rolled back ids) prove nothing.
CREATE TABLE event_horizon (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO event_horizon DEFAULT VALUES;
