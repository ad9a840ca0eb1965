-- Projects and their tasks. The enum's declaration order is the contract's order of statuses,
-- so min(status) over a project's tasks is its lowest status.
CREATE TYPE task_status AS ENUM ('initialized', 'processing', 'failed', 'finished');

CREATE TABLE project (
    uuid        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        varchar(255) NOT NULL CHECK (btrim(name) <> ''),
    description text CHECK (char_length(description) <= 10000),
    price       numeric(14, 2) NOT NULL CHECK (price >= 0),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX project_page_idx ON project (created_at, uuid);

CREATE TABLE task (
    uuid          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id    uuid NOT NULL REFERENCES project (uuid),
    name          varchar(255) NOT NULL CHECK (btrim(name) <> ''),
    description   text CHECK (char_length(description) <= 10000),
    estimate_date date,
    price         numeric(14, 2) CHECK (price >= 0),
    urls          text[] NOT NULL CHECK (cardinality(urls) BETWEEN 1 AND 100),
    status        task_status NOT NULL DEFAULT 'initialized',
    progress      smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    archive_key   text,
    error         text,
    -- Fences every write of an archive run: a run only writes while the row still has its epoch.
    epoch         integer NOT NULL DEFAULT 0,
    upload_id     text,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT task_progress_full_iff_finished CHECK ((progress = 100) = (status = 'finished')),
    CONSTRAINT task_archive_only_when_finished CHECK (archive_key IS NULL OR status = 'finished')
);
-- Serves the foreign key, the per-project aggregates and `GET /tasks?project_id=` in page order.
CREATE INDEX task_project_page_idx ON task (project_id, created_at, uuid);
CREATE INDEX task_page_idx ON task (created_at, uuid);
CREATE INDEX task_status_page_idx ON task (status, created_at, uuid);
