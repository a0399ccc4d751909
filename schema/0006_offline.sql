-- Terminals that keep working while their link is down (docs/offline.md):
-- the hot list's history, so that a terminal can ask for the changes since
-- the version it holds; a debt allowance for the taps decided offline that
-- stand although the engine would have refused them; and the engine's own
-- decision of each such tap, kept beside the terminal's.

-- Every change of a card's place on the hot list (the cards a terminal must
-- refuse offline: any status but active). One row per change, numbered by
-- version: a terminal holding version N needs the rows above N.
--   reason  engine.codes.HotlistReason: 0 the card left the list (active
--           again), 1..5 its status (blocked, lost, stolen, replaced,
--           expired), 6 blocked by the engine as a suspected clone
CREATE TABLE hotlist_changes (
    version   bigserial PRIMARY KEY,
    card_uid  bigint NOT NULL,
    listed    boolean NOT NULL,
    reason    smallint NOT NULL CHECK (reason BETWEEN 0 AND 6),
    at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT listed_has_reason CHECK (listed = (reason <> 0))
);
CREATE INDEX hotlist_changes_card_uid ON hotlist_changes (card_uid, version);
CREATE TRIGGER hotlist_changes_append_only BEFORE UPDATE OR DELETE ON hotlist_changes
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
CREATE TRIGGER hotlist_changes_no_truncate BEFORE TRUNCATE ON hotlist_changes
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_change();

-- The history follows cards.status in the same transaction as every change
-- of it, whoever makes it (the card office, the engine's clone block, a
-- seed). The engine's clone block says why with the transaction-local
-- setting citycard.block_reason = 'clone_suspected'.
--
-- Versions are handed out under a transaction advisory lock ("cityHOTL"),
-- held to the commit: a version is therefore visible before any higher one
-- is handed out, and a reader that has seen version N never later finds a
-- row below N it missed. Status changes are rare (card-office work), so
-- taking turns costs nothing that matters.
--
-- NOTIFY citycard_hotlist reaches the engine at commit; a transaction sends
-- one notice however many rows it wrote (equal notices are folded).
CREATE FUNCTION hotlist_follow_status() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    why smallint;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status = OLD.status THEN
        RETURN NULL;
    END IF;
    IF NEW.status = 0 THEN
        IF TG_OP = 'INSERT' THEN
            RETURN NULL;  -- a new active card was never listed
        END IF;
        why := 0;
    ELSIF NEW.status = 1 AND current_setting('citycard.block_reason', true) = 'clone_suspected' THEN
        why := 6;
    ELSE
        why := NEW.status;
    END IF;
    PERFORM pg_advisory_xact_lock(7163384746562507852);  -- 0x63697479484F544C, "cityHOTL"
    INSERT INTO hotlist_changes (card_uid, listed, reason) VALUES (NEW.uid, why <> 0, why);
    PERFORM pg_notify('citycard_hotlist', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER cards_hotlist AFTER INSERT OR UPDATE OF status ON cards
    FOR EACH ROW EXECUTE FUNCTION hotlist_follow_status();

-- The cards already out of use start the history.
INSERT INTO hotlist_changes (card_uid, listed, reason)
SELECT uid, true, status FROM cards WHERE status <> 0 ORDER BY uid;

-- A card account may go below its floor by at most debt_limit_cents, and
-- only through taps decided offline that stand (the holder already
-- travelled): the engine never takes an account there online. The default
-- is engine.limits.OFFLINE_DEBT_LIMIT_CENTS. Other accounts keep their
-- floor (CASE, not OR: a funding account's floor minus a limit could
-- leave bigint's range).
ALTER TABLE accounts ADD COLUMN debt_limit_cents bigint NOT NULL DEFAULT 2000
    CONSTRAINT debt_limit_bounded CHECK (debt_limit_cents BETWEEN 0 AND 100000);
ALTER TABLE accounts DROP CONSTRAINT balance_not_below_floor;
ALTER TABLE accounts ADD CONSTRAINT balance_not_below_floor CHECK (
    balance_cents >= CASE WHEN kind = 0 THEN floor_cents - debt_limit_cents ELSE floor_cents END);

-- A tap its terminal decided offline (taps.info bit 256, TapInfo.OFFLINE)
-- records the terminal's decision as the tap's result, the amount the
-- terminal charged as requested_cents, what was charged as amount_cents (less
-- only when the debt limit stopped it), and the engine's own decision of it
-- at upload as online_result. A tap decided online has no online_result.
ALTER TABLE taps ADD COLUMN online_result smallint;
ALTER TABLE taps ADD CONSTRAINT offline_has_online_result
    CHECK (((info & 256) <> 0) = (online_result IS NOT NULL));
ALTER TABLE taps ADD CONSTRAINT offline_charges_at_most_its_terminal
    CHECK ((info & 256) = 0 OR amount_cents <= requested_cents);
