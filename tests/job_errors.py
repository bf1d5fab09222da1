"""What the job tests share: the one stderr line a failing `python -m unimoe_kernels` command prints."""

import pytest

from unimoe_kernels.__main__ import main


def error_line(capsys, argv) -> str:
    """main(argv) must exit 2 with exactly one `error:` line on stderr and no traceback; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "error: " in err[0] and "Traceback" not in err[0], err
    return err[0]
