"""CURVE key pairs for the remote control channel (``stimloop keys --dir D --name N``).

A key pair is two files written by ``zmq.auth.create_certificates``:
``N.key`` (public, safe to copy to the other machine) and ``N.key_secret``
(secret, stays where it was made, mode 0600). The control server loads its own
``server.key_secret`` and accepts only clients whose public ``*.key`` file is in
its authorized-clients folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import zmq
import zmq.auth

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyPairExists(FileExistsError):
    """``make_keys`` refused to replace a key pair; ``name`` and ``folder`` say which, so that a
    front end can tell its own way to replace it (the CLI's ``--overwrite``)."""

    def __init__(self, name: str, folder: Path) -> None:
        super().__init__(f"key pair {name!r} already exists in {folder}; pass overwrite=True to replace it")
        self.name, self.folder = name, folder


def make_keys(dir: str | os.PathLike, name: str = "client", overwrite: bool = False) -> tuple[Path, Path]:
    """Create a CURVE key pair ``dir/name.key`` + ``dir/name.key_secret``.

    Returns ``(public_path, secret_path)``. Refuses to overwrite an existing pair
    unless ``overwrite`` (replacing a key silently locks out whoever holds the old one):
    raises ``KeyPairExists``.
    """
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; cannot create control keys")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"key name {name!r} is invalid; expected 1-64 characters from A-Z a-z 0-9 _ . -")
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not overwrite and (public_path.exists() or secret_path.exists()):
        raise KeyPairExists(name, folder)
    pub, sec = zmq.auth.create_certificates(str(folder), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


def load_public_key(path_or_key: str | bytes | os.PathLike) -> bytes:
    """A z85 public key from a ``.key``/``.key_secret`` file, or a 40-character z85 key itself."""
    if isinstance(path_or_key, bytes) and len(path_or_key) == 40:
        return path_or_key
    if isinstance(path_or_key, str) and len(path_or_key) == 40 and not Path(path_or_key).exists():
        return path_or_key.encode("ascii")
    path = Path(path_or_key)
    if not path.is_file():
        raise FileNotFoundError(f"public key {str(path)!r} does not exist; expected a .key file from 'stimloop keys'")
    public, _ = zmq.auth.load_certificate(str(path))
    return public


def load_key_pair(secret_path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a ``.key_secret`` file."""
    path = Path(secret_path)
    if not path.is_file():
        raise FileNotFoundError(f"secret key {str(path)!r} does not exist; expected a .key_secret file from 'stimloop keys'")
    public, secret = zmq.auth.load_certificate(str(path))
    if not secret:
        raise ValueError(f"key file {str(path)!r} holds no secret key; expected the .key_secret file, not the public .key")
    return public, secret
