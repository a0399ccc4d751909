"""Every limit of the engine, in one place, with the reason for its value.

A limit that is not here is a bug: queues, batches, buffers and deadlines all
have an upper bound so that a flood or a slow peer costs a known amount of
memory and time. Protocol constants that a terminal must know (frame sizes)
are repeated in ``docs/protocol.md``; the fast path carries the same values
and ``tests/test_codec.py`` checks them.
"""

from __future__ import annotations

# --- Wire -----------------------------------------------------------------

PROTOCOL_VERSION = 1

# Bytes of the length prefix plus the fixed header (version, type, flags,
# request id). The length prefix counts what follows it, so the smallest legal
# length value is FRAME_HEADER_BYTES - 4.
FRAME_HEADER_BYTES = 12

# The largest frame, length prefix included. v1 messages are at most ~60 bytes;
# 16 KiB leaves room for list transfers in later message types while keeping a
# hostile length prefix from making the engine allocate more than this per
# connection.
MAX_FRAME_BYTES = 16 * 1024

# An ERROR frame's text is a short hint for the vendor's logs, not a document.
ERROR_TEXT_MAX_BYTES = 200

# Nonces in the handshake: 128 bits, enough that two sessions never share one.
NONCE_BYTES = 16

# HMAC-SHA256 output.
PROOF_BYTES = 32

# Sealed frames (after the handshake): a u64 counter, never repeated in a
# session, and HMAC-SHA256 truncated to 128 bits, which leaves a forger one
# chance in 2**128 per try, and every failed try costs it the connection.
SEAL_COUNTER_BYTES = 8
SEAL_TAG_BYTES = 16
SEAL_TRAILER_BYTES = SEAL_COUNTER_BYTES + SEAL_TAG_BYTES

# The lists a terminal keeps for working offline are signed with Ed25519
# (engine/signing.py): 64-byte signatures.
SIGNATURE_BYTES = 64

# Hot-list entries per HOTLIST page (9 bytes each): 1,800 make a body of
# 16,291 bytes with its head and signature, a sealed frame of 16,327, the
# most that fits under MAX_FRAME_BYTES in round hundreds. Gijon's whole list
# (every card not active, some 120,000) is then about 70 pages.
HOTLIST_PAGE_ENTRIES_MAX = 1800

# Fares per RULES message: one per holder profile, and profiles are 0..63
# (schema: profiles.id).
RULES_FARES_MAX = 64

# Offline taps per OFFLINE_UPLOAD (38 bytes each): 256 make a 9.7 KiB frame
# and a 5.9 KiB answer, and the engine decides them in a few milliseconds.
# A validator that was offline for a day uploads its few thousand taps in a
# handful of frames.
OFFLINE_TAPS_PER_UPLOAD_MAX = 256

# --- Connections ------------------------------------------------------------

# Gijón has a few hundred terminals; 10,000 covers a region with headroom while
# bounding file descriptors and per-connection buffers (~16 KiB each).
MAX_CONNECTIONS = 10_000

# A terminal may pipeline requests; more than this unanswered on one
# connection is a misbehaving client. 256 x ~40-byte replies bounds what one
# connection can make the engine hold.
MAX_IN_FLIGHT_PER_CONNECTION = 256

# HELLO -> AUTH_OK must finish within this. A real terminal needs two round
# trips (a few ms); 5 s tolerates a slow mobile link, and stops a peer that
# opens connections and says nothing from holding them.
HANDSHAKE_DEADLINE_S = 5.0

# A session with nothing received for this long is closed. Terminals PING
# every 30 s when idle (see docs/protocol.md), so 90 s is three missed pings.
IDLE_TIMEOUT_S = 90.0

# Frames sessions decide as they arrive in one turn of the event loop; the
# rest wait for later turns (engine/turns.py), so that a finished commit is
# noticed within a few milliseconds however many terminals sent at once.
# At ~6 us a frame (benchmarks.serving) 512 frames are ~3 ms; a city's
# terminals send one or two frames at a time, so only a pipelining crowd
# reaches it.
SESSION_FRAMES_PER_TURN = 512
# Frames the pump decides per turn for the sessions left waiting: another
# ~3 ms. Fewer starve the backlog: the pump runs once a turn, and a turn
# also answers a committed batch (benchmarks.end_to_end at 64 sessions x 128
# taps: 128 a turn gave 37,000-40,000 taps/s, 512 gave 52,000).
PUMP_FRAMES_PER_TURN = 512

# Reply bytes buffered for a connection before the engine stops reading from
# it (transport back-pressure): 64 KiB is ~1,870 TAP_RESULTs of 35 bytes.
WRITE_HIGH_WATER_BYTES = 64 * 1024

# --- Group commit -------------------------------------------------------------

# Most taps in one database transaction. PostgreSQL spends ~8 us of CPU on
# each tap of a batch (benchmarks.end_to_end's closed loop: its CPU over the
# taps committed), so 4,096 taps are a commit of ~30 ms: batches this large
# come only from a saturating load, where they share each fsync among
# thousands of taps, and a tap then waits at most two commits. At a city's
# load batches hold a few taps and commit in about a millisecond.
BATCH_TAPS_MAX = 4096

# Decisions waiting for the writer (queued plus in flight). Beyond this the
# engine answers BUSY_RETRY at once instead of queueing without bound:
# four full batches, ~130 ms of PostgreSQL's work at peak.
WRITER_QUEUE_MAX = 4 * BATCH_TAPS_MAX

# After a failed commit the writer retries the database with exponential
# backoff between these bounds, so a dead database costs a few connection
# attempts a second, not a busy loop.
WRITER_RETRY_MIN_S = 0.05
WRITER_RETRY_MAX_S = 2.0

# --- Terminals working offline (docs/offline.md) ----------------------------------

# Hot-list changes the engine keeps in memory to answer "changes since N".
# A terminal whose version is older than the oldest kept gets the whole list
# instead. Gijon changes a few hundred cards a week (12,000 replacements a
# year, plus blocks): 65,536 changes are more than a year, in about 5 MB.
HOTLIST_CHANGES_KEPT = 65_536

# Signed HOTLIST pages kept for the next terminal that asks the same: after
# a block every connected terminal asks for the same one-change page, and
# signing it once instead of per terminal saves ~50 us each. 256 pages of at
# most 16 KiB bound the cache to 4 MiB.
HOTLIST_PAGES_CACHED = 256

# Rules versions compiled at once for the offline path and for RULES
# answers. Terminals hold the version in force or one of the few before it;
# a version is a few kilobytes compiled.
RULES_VERSIONS_CACHED = 16

# How far below its floor a card account may go through offline taps that
# stand although the account could not pay them (the holder already
# travelled): 20 EUR, a few days of buses, enough that a citizen stuck in a
# tunnel is never turned into an unpaid fare, little enough that a lost
# card cannot run up a debt worth chasing. The schema's default of
# accounts.debt_limit_cents repeats it; the card office sets another per
# card (citycard card debt-limit, docs/admin.md).
OFFLINE_DEBT_LIMIT_CENTS = 2_000

# The largest debt limit the card office may give a card (cents): 1,000 EUR,
# the most a card may ever hold (BALANCE_MAX_CENTS), so no card is let owe
# more than it could have carried. The schema's debt_limit_bounded CHECK
# (schema/0006_offline.sql) repeats it.
DEBT_LIMIT_MAX_CENTS = 100_000

# Offline taps in one batch. An uploaded tap costs a commit about 120 us
# (most pay a fare from an account no other tap of the batch touches: a
# tap row, a balance update and a ledger entry each), and the writer is
# kept busy while uploads last, so an online tap waits for the batch being
# committed, then commits in the next: the median online tap at 1,000 a
# second took ~1.9 ms without uploads, 3.2 ms with 8 offline taps a batch
# and 2.5 ms with 4 (benchmarks.offline_upload on the 2-core reference
# machine), while uploads went in at ~5,200 and ~4,000 taps a second. The
# online objective is what the share is for; a validator's day of a few
# thousand taps still goes in within a second or two.
OFFLINE_TAPS_PER_BATCH_MAX = 4

# Offline decisions waiting for the writer. Beyond this the engine stops
# deciding uploads until the writer has taken some (the terminal waits for
# its answer, nothing is refused): four batches' worth, so the writer never
# waits for the deciding task, and memory holds a few hundred decisions.
OFFLINE_QUEUE_MAX = 4 * OFFLINE_TAPS_PER_BATCH_MAX

# Uploads waiting to be decided, engine-wide. Each holds at most 256 taps;
# beyond this an upload is answered BUSY_RETRY for every tap at once, so
# that a fleet coming back from a depot cannot queue without bound.
OFFLINE_UPLOADS_QUEUED_MAX = 64

# Offline taps decided per turn of the event loop: one batch's share, a
# fraction of a millisecond of the engine's time, then online taps get
# their turn.
OFFLINE_DECIDE_SLICE = OFFLINE_TAPS_PER_BATCH_MAX

# Uploaded taps answered from the record per turn of the event loop (a
# second upload of the same taps): answering one costs a few microseconds,
# so 64 are a fraction of a millisecond before online taps get their turn.
OFFLINE_ANSWERS_PER_TURN = 64

# Uploaded taps checked per turn of the event loop before any is decided
# (refused, answered from memory, or claimed for deciding): a few
# microseconds each (the refusal check and the fingerprint alone 1.5 us on
# the reference machine), so a whole upload of 256 would hold online taps
# for about a millisecond in one turn; 32 keep a turn near a tenth of that.
OFFLINE_CHECKS_PER_TURN = 32

# An offline tap's event time may be at most this long before its upload:
# taps older than 35 days would fall in a month whose report is closed, and
# the clone check's memory of the card is 35 days too. Older ones are
# refused (PROTOCOL_ERROR) and never recorded.
OFFLINE_TAP_AGE_MAX_S = 35 * 86_400

# ...and at most this far after the upload: a terminal clock running up to
# five minutes fast is tolerated, one further ahead is broken.
OFFLINE_CLOCK_AHEAD_MAX_S = 300

# --- Exactly once ---------------------------------------------------------------

# Final results remembered per terminal to answer retries without the
# database. A terminal retries within seconds; 512 covers minutes of a busy
# validator. Older sequences are answered from the taps table.
RECENT_RESULTS_PER_TERMINAL = 512

# Requests waiting on the record at once (retries of old sequences, reversals).
# Each holds a task and waits for one of DB_POOL_MAX connections; beyond this
# the engine answers BUSY_RETRY, so a terminal replaying its history cannot
# make the engine queue without bound. A few hundred per second is the
# normal rate right after a restart.
LOOKUPS_MAX = 1024

# --- Money ----------------------------------------------------------------------

# Largest single top-up (cents): 500 EUR, the city's kiosk limit.
TOPUP_MAX_CENTS = 50_000

# Largest stored value on one card (cents): 1,000 EUR.
BALANCE_MAX_CENTS = 100_000

# A reversal must arrive within this many seconds of the original's record
# time: long enough for a driver to cancel a wrong validation, short enough
# that a reversal cannot be used to refund a finished journey.
REVERSAL_WINDOW_S = 600

# The card office may refund a tap within this many seconds of its record
# time (30 days): long enough for a citizen's complaint to reach the desk,
# short enough that the tap is still in the month's reports being checked.
OFFICE_REFUND_WINDOW_S = 30 * 86_400

# A season pass may be sold to start up to this many days ahead (next
# month's pass bought this month), never in the past.
PASS_START_AHEAD_MAX_DAYS = 31

# --- Database -------------------------------------------------------------------

# Connections used besides the writer's own: state loading, retry look-ups,
# status queries. Retry look-ups are rare, so four is plenty.
DB_POOL_MAX = 4

# A statement that takes longer than this is treated as a database fault.
DB_COMMAND_TIMEOUT_S = 30.0

# --- Card office (admin interface) ------------------------------------------------

# Operator names as the audit trail stores them (audit_log.actor: 1..100).
OPERATOR_NAME_MAX_CHARS = 100

# A card-office request body. The largest (an eligibility period) is about
# 150 bytes of JSON; 4 KiB leaves room for growth while a client that sends
# megabytes is refused before the engine reads them.
ADMIN_BODY_MAX_BYTES = 4 * 1024

# Waiting for a look-up pool connection. The pool is shared with the
# terminals' record look-ups (DB_POOL_MAX); an operator would rather hear
# "database busy" in 5 s than watch a request hang.
ADMIN_POOL_ACQUIRE_S = 5.0

# A card-office top-up is answered after its batch commits (milliseconds).
# While the database is away the writer retries with backoff and answers
# BUSY_RETRY when a batch fails; 10 s bounds the wait when neither happens,
# and the top-up is then retried safely with the same sequence.
ADMIN_REQUEST_WAIT_S = 10.0

# Card-office top-ups whose event time is remembered, so that a retry of one
# still in flight carries the same content and joins it instead of being
# answered SEQUENCE_REUSED. A desk makes a few a minute; 1,024 is hours.
ADMIN_REQUESTS_REMEMBERED = 1024

# A change committed while the in-memory city could not be refreshed (the
# database went away between the two) is re-read this often until it lands:
# a blocked card must not stay usable until the next restart.
ADMIN_REFRESH_RETRY_S = 1.0

# How long stopping the engine waits for card-office requests in progress
# (a top-up waits for its commit) before closing their connections.
ADMIN_SHUTDOWN_S = 5.0
