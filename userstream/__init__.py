"""userstream: streaming, incremental self-supervised user representations.

This package is the foundation every stage imports and the command line on
top of them. The foundation: ``userstream/settings.py`` (every typed
configuration), ``userstream/types.py`` (the shapes the stages share),
``userstream/stores/`` (the state contracts, Redis and in-memory) and
``userstream/embedded.py`` (the embedded broker and Redis). On top:
``userstream/cli/`` (one sub-command per process or job) and
``userstream/stack.py`` (how ``userstream up`` supervises the processes).
Between them the three stages, in the order data flows: ``stream/`` ->
``model/`` -> ``serving/`` (docs/architecture.md has the layers and a line
per module).
"""

from userstream.settings import Settings
from userstream.types import Behavior, Event, Keys

__all__ = ["Behavior", "Event", "Keys", "Settings"]
__version__ = "0.1.0"
