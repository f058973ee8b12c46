"""Print one of the README's set-up commands: the fenced block after `<!-- command: NAME -->`.

CI runs the README's own words (`.ci/run`), so the commands a new user copies are the
ones that are tested; a README edit cannot drift from what CI proves.
"""
import pathlib
import re
import sys

name = sys.argv[1]
readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
match = re.search(rf"<!-- command: {re.escape(name)} -->\s*```bash\n(.*?)\n```", readme, re.S)
if not match or "\n" in match.group(1).strip():
    sys.exit(f"readme_command.py: README.md has no one-line command block marked "
             f"'<!-- command: {name} -->'")
print(match.group(1).strip())
