-- Core schema: holders, cards, accounts, services, tariffs, terminals, the
-- append-only record of every decision (taps) and the double-entry ledger.
--
-- Money is integer cents (bigint). The rules the engine enforces in memory are
-- repeated here as constraints, so that a bug in the engine cannot write a
-- state the city would not accept.

CREATE TABLE profiles (
    id          smallint PRIMARY KEY CHECK (id >= 0 AND id < 64),
    code        text NOT NULL UNIQUE,
    name        text NOT NULL
);

CREATE TABLE holders (
    id          bigint PRIMARY KEY,
    profile_id  smallint NOT NULL REFERENCES profiles (id),
    birth_date  date,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- kind: 0 = card (a holder's stored value), 1 = revenue (one per service),
-- 2 = funding (money entering or leaving the system: cash at kiosks, opening
-- balances). Funding accounts go negative by design: their floor is the
-- lowest bigint the engine will ever reach.
CREATE TABLE accounts (
    id             bigint PRIMARY KEY,
    kind           smallint NOT NULL CHECK (kind IN (0, 1, 2)),
    name           text NOT NULL,
    balance_cents  bigint NOT NULL DEFAULT 0,
    floor_cents    bigint NOT NULL DEFAULT 0,
    ceiling_cents  bigint NOT NULL DEFAULT 9223372036854775807,
    CONSTRAINT balance_not_below_floor CHECK (balance_cents >= floor_cents),
    CONSTRAINT balance_not_above_ceiling CHECK (balance_cents <= ceiling_cents),
    CONSTRAINT card_floor_bounded CHECK (kind <> 0 OR floor_cents BETWEEN -100000 AND 0)
);

-- status: see engine.codes.CardStatus (0 active .. 5 expired).
CREATE TABLE cards (
    uid         bigint PRIMARY KEY,
    holder_id   bigint NOT NULL REFERENCES holders (id),
    account_id  bigint NOT NULL REFERENCES accounts (id),
    status      smallint NOT NULL DEFAULT 0 CHECK (status BETWEEN 0 AND 5),
    issued_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cards_account_id ON cards (account_id);

CREATE TABLE services (
    id                  smallint PRIMARY KEY CHECK (id >= 0),
    code                text NOT NULL UNIQUE,
    name                text NOT NULL,
    revenue_account_id  bigint NOT NULL UNIQUE REFERENCES accounts (id)
);

-- A missing row means the service does not serve that profile.
CREATE TABLE tariffs (
    service_id  smallint NOT NULL REFERENCES services (id),
    profile_id  smallint NOT NULL REFERENCES profiles (id),
    fare_cents  integer NOT NULL CHECK (fare_cents >= 0 AND fare_cents <= 100000),
    PRIMARY KEY (service_id, profile_id)
);

-- Terminal keys are never stored: each is derived from the engine's master
-- secret, the terminal id and key_version (see engine/keys.py). Rotating a
-- key is incrementing key_version and provisioning the new key.
-- kind: see engine.codes.TerminalKind. status: 0 active, 1 inactive.
CREATE TABLE terminals (
    id                  integer PRIMARY KEY CHECK (id > 0),
    service_id          smallint NOT NULL REFERENCES services (id),
    kind                smallint NOT NULL CHECK (kind IN (0, 1)),
    key_version         smallint NOT NULL DEFAULT 1 CHECK (key_version > 0),
    status              smallint NOT NULL DEFAULT 0 CHECK (status IN (0, 1)),
    name                text NOT NULL,
    funding_account_id  bigint REFERENCES accounts (id),
    CONSTRAINT kiosk_has_funding CHECK (kind <> 1 OR funding_account_id IS NOT NULL)
);

-- The high-volume, append-only tables below (batches, taps, ledger_transfers,
-- ledger_entries) carry no foreign keys: a key costs one index look-up per row
-- at commit, four per tap, which was most of the commit time of a batch. Their
-- references stay sound because (1) the engine writes only ids it loaded from
-- the referenced tables, (2) referenced rows can never be deleted (the
-- no-delete triggers at the end of this file) and (3) `citycard status`
-- counts orphans, which must always be zero.

-- One row per group commit. The writer inserts it in the same transaction as
-- the batch, so after a lost connection during COMMIT the engine can tell
-- whether the batch is durable by looking for its id.
CREATE TABLE batches (
    id            bigint PRIMARY KEY,
    taps          integer NOT NULL CHECK (taps > 0),
    committed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Every decision, declines included. (terminal_id, terminal_seq) is the
-- terminal's idempotency key: the primary key makes a double record
-- impossible. event_time is the terminal's clock, recorded_at the engine's.
-- kind: engine.codes.OperationKind. result: engine.codes.ResultCode.
-- requested_cents: the top-up amount asked for (0 for taps and reversals).
-- amount_cents: money moved (fare, top-up, refund); 0 when declined.
CREATE TABLE taps (
    terminal_id      integer NOT NULL,
    terminal_seq     bigint NOT NULL CHECK (terminal_seq >= 0),
    kind             smallint NOT NULL CHECK (kind IN (0, 1, 2)),
    card_uid         bigint NOT NULL,
    card_counter     bigint NOT NULL DEFAULT 0,
    tap_flags        smallint NOT NULL DEFAULT 0,
    requested_cents  bigint NOT NULL DEFAULT 0,
    original_seq     bigint,
    event_time       timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL,
    result           smallint NOT NULL,
    amount_cents     bigint NOT NULL DEFAULT 0 CHECK (amount_cents >= 0),
    balance_cents    bigint NOT NULL DEFAULT 0,
    service_id       smallint NOT NULL,
    account_id       bigint,
    batch_id         bigint NOT NULL,
    PRIMARY KEY (terminal_id, terminal_seq),
    CONSTRAINT declines_move_nothing CHECK (result = 0 OR amount_cents = 0),
    CONSTRAINT reversal_names_original CHECK ((kind = 2) = (original_seq IS NOT NULL))
);
CREATE INDEX taps_recorded_at ON taps (recorded_at);
CREATE INDEX taps_account_id ON taps (account_id) WHERE account_id IS NOT NULL;

-- Double entry. A transfer groups entries that sum to zero: per batch, one
-- transfer per (kind, service) with one entry per account touched.
-- kind: 0 fare, 1 top-up, 2 reversal, 3 opening balance / adjustment.
CREATE TABLE ledger_transfers (
    id          bigint PRIMARY KEY,
    batch_id    bigint,
    kind        smallint NOT NULL CHECK (kind IN (0, 1, 2, 3)),
    service_id  smallint,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ledger_transfers_batch_id ON ledger_transfers (batch_id);

CREATE TABLE ledger_entries (
    transfer_id   bigint NOT NULL,
    account_id    bigint NOT NULL,
    amount_cents  bigint NOT NULL CHECK (amount_cents <> 0),
    PRIMARY KEY (transfer_id, account_id)
);
CREATE INDEX ledger_entries_account_id ON ledger_entries (account_id);

-- The entries each statement inserts must sum to zero per transfer. The writer
-- inserts all of a batch's entries in one statement.
CREATE FUNCTION ledger_check_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    unbalanced bigint;
BEGIN
    -- Only the rows this statement inserted: if every statement adds entries
    -- that sum to zero per transfer, every transfer sums to zero. Looking at
    -- the whole table instead would make each commit slower as the ledger
    -- grows.
    SELECT i.transfer_id INTO unbalanced
    FROM inserted i
    GROUP BY i.transfer_id
    HAVING sum(i.amount_cents) <> 0
    LIMIT 1;
    IF unbalanced IS NOT NULL THEN
        RAISE EXCEPTION 'ledger transfer % does not sum to zero', unbalanced
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER ledger_entries_balanced
    AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_balanced();

-- The record of decisions and the ledger are append-only.
CREATE FUNCTION forbid_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER taps_append_only BEFORE UPDATE OR DELETE ON taps
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER ledger_transfers_append_only BEFORE UPDATE OR DELETE ON ledger_transfers
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER batches_append_only BEFORE UPDATE OR DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- Row triggers do not fire on TRUNCATE, which would empty these tables in one
-- statement; statement triggers close that gap.
CREATE TRIGGER taps_no_truncate BEFORE TRUNCATE ON taps
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();
CREATE TRIGGER ledger_transfers_no_truncate BEFORE TRUNCATE ON ledger_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();
CREATE TRIGGER batches_no_truncate BEFORE TRUNCATE ON batches
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- A tap or top-up can be reversed once: the second approved reversal of the
-- same original is impossible, whatever the engine believes.
CREATE UNIQUE INDEX taps_one_reversal ON taps (terminal_id, original_seq)
    WHERE kind = 2 AND result = 0;

-- Rows that the append-only tables refer to are never deleted: cards and
-- terminals are retired by status, accounts live as long as their ledger.
CREATE FUNCTION forbid_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are never deleted (retire them by status)', TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER accounts_never_deleted BEFORE DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();
CREATE TRIGGER terminals_never_deleted BEFORE DELETE OR TRUNCATE ON terminals
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();
CREATE TRIGGER services_never_deleted BEFORE DELETE OR TRUNCATE ON services
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();
CREATE TRIGGER cards_never_deleted BEFORE DELETE OR TRUNCATE ON cards
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();
