"""Rewrite the settings table in README.md from the code (`recsys config --markdown`)."""

import re
import sys
from pathlib import Path

from recsys.config import settings_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
pattern = re.compile(r"(<!-- settings:begin[^\n]*-->\n).*?(\n<!-- settings:end -->)", re.S)
if not pattern.search(text):
    sys.exit("README.md has no settings markers")
readme.write_text(pattern.sub(lambda m: m.group(1) + settings_markdown() + m.group(2), text))
print("README.md settings table updated")
