-- Season passes and multi-ride tickets held by cards, and reversals that
-- name a tap of another terminal (card-office refunds).

-- A product sold to an account (the money behind a card and its
-- replacements, so a replacement card keeps its passes). The kind and group
-- are copied from the rules version it was sold under, so a later version
-- that drops or renames the product leaves what was sold as it was.
--   kind 0  season pass: every tap at the group is paid from valid_from to
--           valid_until, both days included (UTC days, like eligibility)
--   kind 1  multi-ride ticket: pays `rides` taps at the group, never expires
-- rides_used is kept by the batch writer in the same statement as the taps
-- that use or give back a ride (taps.product_id), so it always equals the
-- approved taps paid with the ticket minus their approved reversals
-- (citycard reconcile checks it).
CREATE TABLE card_products (
    id             bigserial PRIMARY KEY,
    account_id     bigint NOT NULL REFERENCES accounts (id),
    product_code   text NOT NULL CHECK (length(product_code) BETWEEN 1 AND 64),
    kind           smallint NOT NULL CHECK (kind IN (0, 1)),
    group_code     text NOT NULL CHECK (length(group_code) BETWEEN 1 AND 64),
    rules_version  integer NOT NULL REFERENCES rules_versions (version),
    valid_from     date,
    valid_until    date,
    rides          integer,
    rides_used     integer NOT NULL DEFAULT 0,
    -- Paid at the card office's counter (cash or bank card), not from the
    -- card's stored value: the sale moves no money inside the ledger.
    price_cents    bigint NOT NULL CHECK (price_cents >= 0),
    sold_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    sold_by        text NOT NULL CHECK (length(sold_by) BETWEEN 1 AND 100),
    sold_to_card   bigint NOT NULL REFERENCES cards (uid),
    CONSTRAINT season_has_period CHECK (
        kind <> 0 OR (valid_from IS NOT NULL AND valid_until >= valid_from AND rides IS NULL)),
    CONSTRAINT ticket_has_rides CHECK (
        kind <> 1 OR (rides > 0 AND valid_from IS NULL AND valid_until IS NULL)),
    -- No ride used twice, none given back that was not used.
    CONSTRAINT rides_within_ticket CHECK (rides_used >= 0 AND (rides IS NULL OR rides_used <= rides))
);
CREATE INDEX card_products_account_id ON card_products (account_id);
-- Products are never deleted: taps refer to them.
CREATE TRIGGER card_products_never_deleted BEFORE DELETE OR TRUNCATE ON card_products
    FOR EACH STATEMENT EXECUTE FUNCTION forbid_delete();

-- The product that paid a tap (or whose ride a reversal gave back).
ALTER TABLE taps ADD COLUMN product_id bigint REFERENCES card_products (id);

-- A reversal names its original by sequence; the original is a request of
-- the same terminal unless original_terminal_id says otherwise (a refund
-- made at the card office names a tap of a bus validator).
ALTER TABLE taps ADD COLUMN original_terminal_id integer REFERENCES terminals (id);
ALTER TABLE taps ADD CONSTRAINT original_terminal_for_reversals
    CHECK (original_terminal_id IS NULL OR kind = 2);

-- One approved reversal per original, whichever terminal asked for it.
DROP INDEX taps_one_reversal;
CREATE UNIQUE INDEX taps_one_reversal ON taps ((coalesce(original_terminal_id, terminal_id)), original_seq)
    WHERE kind = 2 AND result = 0;
