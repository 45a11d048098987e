"""Temporary files for atomic writes (a file written beside its target, then renamed over it)."""

import os
import secrets


def create_temp_file(directory, prefix):
    """The path of a new, empty file named `prefix`<random>.tmp in `directory`, created with the permissions a plain
    open() gives (0666 less the umask): tempfile.mkstemp's are 0600, which the rename kept, so an adapter or JSON
    file saved for another user (a serving container, a shared checkpoint folder) could not be read by them. A name
    no other writer holds: two runs saving to one path had shared a fixed PATH.tmp."""
    while True:
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
