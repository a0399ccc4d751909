"""citycard: a transaction engine for a city's citizen card.

Terminals tap cards over a binary TCP protocol (docs/protocol.md); the engine
decides each tap in memory and commits the effects to PostgreSQL in batches.
"""

__version__ = "0.1.0"
