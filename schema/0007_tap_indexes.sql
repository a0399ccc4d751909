-- Every tap row is inserted once and never changed, so each index on taps is
-- paid by every commit, one entry a tap. Two of them cost more than they
-- gave:
--
-- taps_account_id served no query: the card office reads an account's
-- balance and products, and the reports read taps by day. Its inserts went
-- to random leaf pages (one per account), the costliest index of the table.
--
-- taps_recorded_at serves the ranges of the reports and the restart's
-- rebuild (a day, a month). recorded_at is the engine's clock when the
-- batch was made, so it grows with the table's physical order: a BRIN index
-- (the smallest and largest time of each range of 128 pages) finds the same
-- pages for a fraction of a B-tree's size, and a tap costs it nothing but
-- the update of its range's summary. Ranges filled since the last summary
-- are read whole by every scan until autovacuum summarizes them
-- (autosummarize), so today's taps are never missed, only read in full.
--
-- Together, on the closed loop of benchmarks.end_to_end, PostgreSQL's CPU
-- per tap fell by about a quarter (docs/performance.md).
DROP INDEX taps_account_id;
DROP INDEX taps_recorded_at;
CREATE INDEX taps_recorded_at ON taps USING brin (recorded_at) WITH (autosummarize = on);
