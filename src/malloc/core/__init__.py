"""The lowest layer: what every other layer exchanges. Tokens and events (``tokens``), the stored per-user state
(``state``) and the attention statistics that query-aware policies read (``stats``). It imports nothing of MALLOC
but :mod:`malloc.errors`."""
