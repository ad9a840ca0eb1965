-- The transactional outbox: one row per change, written in the change's own transaction.
-- Ids are drawn under a transaction-level advisory lock, so they are handed out in commit
-- order and "everything after the last id seen" never skips a late commit.
CREATE SEQUENCE event_id_seq AS bigint;

CREATE TABLE event (
    id          bigint PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('task.created', 'task.updated', 'task.archived',
                                              'project.created', 'project.updated')),
    task_id     uuid,
    project_id  uuid NOT NULL,
    changed     text[] NOT NULL DEFAULT '{}',
    -- The task (with its project) or the project as it was at commit, archive link excluded:
    -- links are signed afresh when the event is delivered.
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX event_created_idx ON event (created_at);
