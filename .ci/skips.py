"""Skipped tests of a junit report grouped by reason; exit 1 if one is not in the allow-list.

Usage: python .ci/skips.py REPORT.xml tests/expected_skips.txt
"""
import fnmatch
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

report, allow_file = sys.argv[1:]
allowed = [line.split("#")[0].strip() for line in open(allow_file)]
allowed = [pattern for pattern in allowed if pattern]
by_reason = defaultdict(list)
for case in ET.parse(report).iter("testcase"):
    skip = case.find("skipped")
    if skip is None:
        continue
    node = case.get("classname").replace(".", "/") + ".py::" + case.get("name")
    by_reason[skip.get("message", "").strip() or "(no reason)"].append(node)
unexpected = []
print(f"\nCI: {sum(map(len, by_reason.values()))} skipped tests")
for reason, nodes in sorted(by_reason.items()):
    print(f"  {reason} ({len(nodes)}):")
    for node in sorted(nodes):
        ok = any(fnmatch.fnmatchcase(node, pattern) for pattern in allowed)
        print(f"    {node}{'' if ok else '   <- NOT EXPECTED'}")
        if not ok:
            unexpected.append(node)
if unexpected:
    print(f"CI: {len(unexpected)} skipped tests are not in {allow_file}: run them, or list "
          f"them there with the reason", file=sys.stderr)
    sys.exit(1)
