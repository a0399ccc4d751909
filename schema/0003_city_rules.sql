-- City-card rules and card-office operations: versioned rules, service kinds,
-- concession eligibility, the card office's audit trail, terminal locations,
-- and what each decision records about the rules that made it.

-- A rules file (rules/*.toml, read by engine/rules.py) as loaded: the whole
-- document, validated, so that any past decision can be explained by the
-- version it names. Versions only grow; a version is never edited.
CREATE TABLE rules_versions (
    version      integer PRIMARY KEY CHECK (version > 0),
    name         text NOT NULL,
    document     jsonb NOT NULL,
    sha256       text NOT NULL CHECK (length(sha256) = 64),
    loaded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    loaded_by    text NOT NULL
);
CREATE TRIGGER rules_versions_append_only BEFORE UPDATE OR DELETE ON rules_versions
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER rules_versions_no_truncate BEFORE TRUNCATE ON rules_versions
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- kind: 0 pay per use, 1 pay per duration (entry and exit taps), 2
-- identification only (nothing debited, access recorded). See
-- engine.codes.ServiceKind.
ALTER TABLE services ADD COLUMN kind smallint NOT NULL DEFAULT 0 CHECK (kind IN (0, 1, 2));

-- Where a terminal stands (WGS84 degrees), for the card-sharing check: the
-- same card at two terminals farther apart than can be travelled in the
-- elapsed time. NULL: not located (the check skips it).
ALTER TABLE terminals ADD COLUMN latitude double precision CHECK (latitude BETWEEN -90 AND 90);
ALTER TABLE terminals ADD COLUMN longitude double precision CHECK (longitude BETWEEN -180 AND 180);

-- What every decision records beyond its result:
--   rules_version  the rules version that decided it (0: before versioned rules)
--   fare_profile   the profile whose fare applied (the holder's concession, or
--                  the standard profile when the concession was not valid)
--   info           engine.codes.TapInfo bits: why that fare, what to show
ALTER TABLE taps ADD COLUMN rules_version integer NOT NULL DEFAULT 0 CHECK (rules_version >= 0);
ALTER TABLE taps ADD COLUMN fare_profile smallint;
ALTER TABLE taps ADD COLUMN info integer NOT NULL DEFAULT 0 CHECK (info >= 0);

-- A holder's right to a concession profile: where it comes from (student
-- enrolment, pension, ...), from and until when. The concession fare applies
-- only on days within [valid_from, valid_until]. One row per (holder,
-- profile): a renewal replaces the period.
CREATE TABLE eligibility (
    holder_id    bigint NOT NULL REFERENCES holders (id),
    profile_id   smallint NOT NULL REFERENCES profiles (id),
    source       text NOT NULL CHECK (source IN (
                     'enrolment', 'pension', 'unemployment', 'age',
                     'residency', 'disability', 'large_family', 'office')),
    valid_from   date NOT NULL,
    valid_until  date NOT NULL,
    import_id    bigint,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (holder_id, profile_id),
    CONSTRAINT eligibility_period CHECK (valid_until >= valid_from)
);

-- One row per registry file imported (citycard eligibility import).
CREATE TABLE eligibility_imports (
    id           bigserial PRIMARY KEY,
    file_name    text NOT NULL,
    sha256       text NOT NULL CHECK (length(sha256) = 64),
    rows         integer NOT NULL CHECK (rows >= 0),
    imported_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    imported_by  text NOT NULL
);

-- Who did what to which card, holder, terminal or rules version, and when:
-- every card-office operation writes one row in the same transaction as its
-- change. Append-only.
CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor    text NOT NULL CHECK (length(actor) BETWEEN 1 AND 100),
    action   text NOT NULL,
    subject  text NOT NULL,
    detail   jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_subject ON audit_log (subject);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- Cards replaced by another: the new card points at the old one. The new
-- card shares the old one's holder and account, so balance, passes and
-- eligibility carry over without moving money.
ALTER TABLE cards ADD COLUMN replaces_uid bigint UNIQUE;

-- Holders are never deleted either: eligibility, cards and the audit trail
-- refer to them.
CREATE TRIGGER holders_never_deleted BEFORE DELETE OR TRUNCATE ON holders
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();
