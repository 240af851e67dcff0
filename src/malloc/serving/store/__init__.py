"""The persistent per-user state store: a user's :class:`~malloc.core.state.UserState` kept between requests.

- :mod:`.codec`: a state as bytes and back, exactly, without pickle (entry format, header, checksum, identity);
- :mod:`.identity`: what an entry is valid for (a model digest, the scheme's name and knobs);
- :mod:`.base`: the one store interface (get, put, delete, sizes, keys, close, optional byte capacity);
- backends, opened by :func:`open_store` from a URL: ``memory://`` (:mod:`.memory_store`), ``sqlite:///path``
  (:mod:`.sqlite_store`), ``lmdb:///path`` (:mod:`.lmdb_store`, the default persistent one:
  :func:`persistent_url`), ``redis://host:port/db`` (:mod:`.redis_store`), ``redis+cluster://host:port,...``
  (:mod:`.redis_cluster_store`: a Redis Cluster, each user's keys on one slot);
- :mod:`.hot`: :class:`HotTier`, the most recently used entries kept in process in front of a store, written
  through;
- :mod:`.states`: :class:`StateStore`, states in and out of a store with unusable entries counted as misses.

docs/SERVING.md, "State store", describes the format, the backends and their measured latency.
"""

from malloc.serving.store.base import Store
from malloc.serving.store.codec import EntryIdentity, decode, encode, header_bytes, read_header
from malloc.serving.store.errors import (
    CorruptEntry,
    EntryError,
    StaleEntry,
    StoreError,
    StoreFull,
    StoreUnavailable,
)
from malloc.serving.store.hot import HotTier
from malloc.serving.store.identity import entry_identity, model_digest, scheme_identity
from malloc.serving.store.states import StateStore
from malloc.serving.store.url import DEFAULT_PERSISTENT, open_store, persistent_url

__all__ = [
    "DEFAULT_PERSISTENT",
    "CorruptEntry",
    "EntryError",
    "EntryIdentity",
    "HotTier",
    "StaleEntry",
    "StateStore",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "decode",
    "encode",
    "entry_identity",
    "header_bytes",
    "model_digest",
    "open_store",
    "persistent_url",
    "read_header",
    "scheme_identity",
]
