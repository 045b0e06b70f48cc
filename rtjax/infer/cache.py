"""Persistent XLA compilation cache: a second process serving the same model
loads its executables instead of compiling them (local or gs:// directory)."""

import collections

import jax
from jax import monitoring

_EVENTS = ("/jax/compilation_cache/cache_hits",
           "/jax/compilation_cache/cache_misses")
_counts: collections.Counter = collections.Counter()


def _count(event: str, **kwargs) -> None:
  del kwargs
  if event in _EVENTS:
    _counts[event.rsplit("/", 1)[-1]] += 1


def enable_compilation_cache(directory: str) -> None:
  """Call before the first compilation; caches every executable, however small."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if not _counts:
    monitoring.register_event_listener(_count)
    _counts.update(cache_hits=0, cache_misses=0)


def cache_counts() -> dict[str, int]:
  """Cache hits and misses of this process since the cache was enabled."""
  return dict(_counts)
