"""Beyond one machine: bridge segq queues to a NATS JetStream stream, both ways, exactly once.

``forward`` publishes a local queue's records to a stream; ``pull`` sends a
stream's messages (through a durable consumer) into a local queue.  Both are
coroutines that run until their ``stop`` event is set; ``segq forward`` and
``segq pull`` run them from the shell.  See docs/scaling.md.

Needs the ``nats`` extra (``pip install 'segq[nats]'``, which brings nats-py);
``import segq`` never imports this package, and this package imports nats-py
only when a bridge starts.
"""

from ._forward import ForwardStats, forward
from ._link import BridgeError
from ._pull import PullStats, pull

__all__ = ["forward", "pull", "BridgeError", "ForwardStats", "PullStats"]
