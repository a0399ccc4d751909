-- Terminal key rotation without downtime (engine/key_rotation.py).
--
-- No key is stored: a terminal's key is derived from the master secret, its
-- id and a key version. While next_key_version is set, the terminal may
-- authenticate with its current version or with this one; its first
-- successful handshake under the next version makes it current (the engine
-- sets key_version to it and clears this column) and the old key is refused
-- from then on. Only the version right after the current one can be
-- pending, so a rotation never skips a key.
ALTER TABLE terminals ADD COLUMN next_key_version smallint
    CONSTRAINT next_key_version_follows CHECK (next_key_version = key_version + 1);
