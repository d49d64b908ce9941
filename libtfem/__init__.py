"""tfem: temporary files handed from process to process through memory.

    import tfem
    with tfem.connect() as client:
        with client.open("run1/part0", "w") as f:
            f.write(data)          # published when the block ends
        with client.open("run1/part0", "r", timeout=30) as f:
            data = f.read()        # consumed when the block ends
"""

from .client import Client, connect, set_wait_mode
from .errors import (
    AlreadyExists, BadDescriptor, BrokerUnavailable, Busy, ChecksumMismatch, InvalidArgument, NameTooLong,
    FileTooLarge, NoSpace, NotFound, ProtocolError, TfemError, Timeout, WouldBlock, WrongMode,
)
from .files import TfemFile
from .posix import (
    TFEM_AUTO, TFEM_NONBLOCK, TFEM_RDONLY, TFEM_WRONLY, tfem_close, tfem_fstat, tfem_lseek,
    tfem_open, tfem_read, tfem_stat, tfem_unlink, tfem_write,
)
from .states import State
from .table import FileStat

__version__ = "0.1.0"

__all__ = [
    "Client", "connect", "set_wait_mode", "TfemFile", "FileStat", "State",
    "TfemError", "AlreadyExists", "BadDescriptor", "BrokerUnavailable", "Busy", "ChecksumMismatch",
    "InvalidArgument", "FileTooLarge",
    "NameTooLong", "NoSpace", "NotFound", "ProtocolError", "Timeout", "WouldBlock", "WrongMode",
    "TFEM_RDONLY", "TFEM_WRONLY", "TFEM_AUTO", "TFEM_NONBLOCK",
    "tfem_open", "tfem_write", "tfem_read", "tfem_lseek", "tfem_stat", "tfem_fstat",
    "tfem_close", "tfem_unlink",
]
