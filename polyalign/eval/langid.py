"""Old import path of :mod:`polyalign.text.langid` (moved in 0.1.1 so imports go one way); removed in 0.2."""

from polyalign.text.langid import dominant_script, identify, in_language, script_shares  # noqa: F401
