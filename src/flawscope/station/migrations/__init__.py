"""Alembic migrations of the record store (run by :func:`flawscope.station.db.upgrade`)."""
