-- A project's aggregates (latest estimate, lowest status, least progress, count) read only this
-- index when the table is vacuumed: no heap visit per task on every page of projects.
CREATE INDEX task_project_aggregate_idx ON task (project_id) INCLUDE (estimate_date, status, progress);
