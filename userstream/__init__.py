"""userstream: streaming, incremental self-supervised user representations.

Start reading at ``userstream/cli.py`` (one sub-command per process), then
``userstream/stack.py`` (how ``userstream up`` supervises them), then the three
stages in the order data flows: ``stream/`` -> ``model/`` -> ``serving/``.
``userstream/settings.py`` holds every setting; ``userstream/types.py`` the
shapes the stages share.
"""

from userstream.settings import Settings
from userstream.types import Behavior, Event, Keys

__all__ = ["Behavior", "Event", "Keys", "Settings"]
__version__ = "0.1.0"
