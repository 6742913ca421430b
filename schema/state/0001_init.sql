-- SPDX-License-Identifier: Apache-2.0
-- 0001_init: the initial state schema. See docs/state.md for the meaning of every table.
-- Applied by src/state/migrate.cc inside one transaction; schema_migrations and user_version are
-- maintained by the migration runner, not by this file.
--
-- Timestamps are RFC 3339 UTC with milliseconds ("2024-05-01T12:00:00.123Z").
-- Secret *values* are never stored anywhere in this database; see docs/state.md.

CREATE TABLE projects (
  name       TEXT NOT NULL PRIMARY KEY CHECK (length(name) > 0),
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE sandboxes (
  id                    TEXT NOT NULL PRIMARY KEY CHECK (length(id) > 0),
  project               TEXT NOT NULL REFERENCES projects (name) ON DELETE RESTRICT,
  name                  TEXT NOT NULL CHECK (length(name) > 0),
  source_file           TEXT,
  -- The applied, normalized spec. Secrets appear only as references (env var, file, command).
  spec_json             TEXT NOT NULL CHECK (json_valid(spec_json)),
  spec_hash             TEXT NOT NULL,
  -- {"<field group>": "<sha256 hex>", ...}: lets plan() tell recreate from live changes.
  group_hashes          TEXT NOT NULL DEFAULT '{}'
                        CHECK (json_valid(group_hashes) AND json_type(group_hashes) = 'object'),
  -- Keyed hash over the resolved secret values, for rotation detection only.
  secrets_hash          TEXT,
  status                TEXT NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'creating', 'running', 'stopped', 'crashed',
                                          'failed', 'removing')),
  generation            INTEGER NOT NULL DEFAULT 1 CHECK (generation >= 1),
  supervisor_pid        INTEGER CHECK (supervisor_pid IS NULL OR supervisor_pid > 0),
  supervisor_start_time INTEGER CHECK (supervisor_start_time IS NULL OR supervisor_start_time >= 0),
  last_error            TEXT,
  created_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  UNIQUE (project, name),
  CHECK ((supervisor_pid IS NULL) = (supervisor_start_time IS NULL))
) STRICT;

CREATE INDEX sandboxes_by_status ON sandboxes (status);

CREATE TABLE vms (
  id         TEXT NOT NULL PRIMARY KEY CHECK (length(id) > 0),
  sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
  backend    TEXT NOT NULL CHECK (length(backend) > 0),
  pid        INTEGER CHECK (pid IS NULL OR pid > 0),
  start_time INTEGER CHECK (start_time IS NULL OR start_time >= 0),
  status     TEXT NOT NULL DEFAULT 'creating'
             CHECK (status IN ('creating', 'starting', 'running', 'stopping', 'stopped',
                               'crashed', 'failed')),
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  CHECK ((pid IS NULL) = (start_time IS NULL))
) STRICT;

CREATE INDEX vms_by_sandbox ON vms (sandbox_id);

-- One subnet per sandbox out of a configurable pool. idx is the position in the pool; both idx and
-- cidr are unique, which is the cross-process safety net behind allocateSubnet().
CREATE TABLE subnets (
  sandbox_id TEXT NOT NULL PRIMARY KEY REFERENCES sandboxes (id) ON DELETE CASCADE,
  idx        INTEGER NOT NULL UNIQUE CHECK (idx >= 0),
  cidr       TEXT NOT NULL UNIQUE,
  gateway    TEXT NOT NULL,
  guest_ip   TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

-- Kernel objects and files a sandbox owns. A row is written in state 'intent' *before* the object
-- is created, so a crash at any point leaves a record the reconciler can converge or delete.
-- ON DELETE RESTRICT: a sandbox row cannot disappear while it still owns resources.
CREATE TABLE owned_resources (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE RESTRICT,
  kind       TEXT NOT NULL
             CHECK (kind IN ('tap', 'nft_table', 'disk', 'run_dir', 'process', 'netns', 'socket')),
  name       TEXT NOT NULL CHECK (length(name) > 0),
  state      TEXT NOT NULL DEFAULT 'intent' CHECK (state IN ('intent', 'created', 'deleting')),
  detail     TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail)),
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  UNIQUE (kind, name)
) STRICT;

CREATE INDEX owned_resources_by_sandbox ON owned_resources (sandbox_id);

-- Append-only event log. project and sandbox_id are plain values, not foreign keys: events outlive
-- the rows they describe.
CREATE TABLE events (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  ts         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
  project    TEXT,
  sandbox_id TEXT,
  kind       TEXT NOT NULL CHECK (length(kind) > 0),
  message    TEXT NOT NULL DEFAULT '',
  data       TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data))
) STRICT;

CREATE INDEX events_by_sandbox ON events (sandbox_id, id);
CREATE INDEX events_by_project ON events (project, id);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
  SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
  SELECT RAISE(ABORT, 'events are append-only');
END;
