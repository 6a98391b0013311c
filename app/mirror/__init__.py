"""Mirror: FUSE layer, replication protocol, receiver, journal, resync."""
