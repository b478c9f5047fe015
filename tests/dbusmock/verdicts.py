"""Turns one test file's pytest JUnit XML into one verdict line per case.

Usage: verdicts.py XML NOTE < CASES

CASES holds the node ids that collection found for the file, one a line
(tests/test_api.py::TestAPI::test_foo). Prints for each, in that order,
"VERDICT<TAB>SECONDS<TAB>NODE_ID<TAB>DETAIL" with VERDICT one of PASS, FAIL,
SKIP. A case the XML does not hold (the file timed out, or pytest died
before it wrote the XML) is a FAIL whose detail is NOTE. Only the standard
library, so that Debian's python3 runs it as it is.
"""

import sys
import xml.etree.ElementTree as ET

RANK = {"PASS": 0, "SKIP": 1, "FAIL": 2}


def junit_key(node_id):
    """The (classname, name) pair pytest's JUnit XML writes for a node id."""
    parts = node_id.split("::")
    module = parts[0]
    if module.endswith(".py"):
        module = module[: -len(".py")]
    names = [module.replace("/", ".")] + parts[1:-1]
    return ".".join(names), parts[-1]


def one_line(text):
    """The first non-empty line of a message, cut to 200 characters."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def verdict_of(case):
    """PASS, FAIL or SKIP, with a detail, for one <testcase> element."""
    for tag, prefix in (("failure", ""), ("error", "error: ")):
        found = case.find(tag)
        if found is not None:
            return "FAIL", prefix + one_line(found.get("message") or found.text)
    skipped = case.find("skipped")
    if skipped is not None:
        return "SKIP", one_line(skipped.get("message"))
    return "PASS", ""


def read_results(path):
    """Maps (classname, name) to (verdict, seconds, detail); the worst wins
    when a case appears twice (it passed, then its teardown failed)."""
    results = {}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return results
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        verdict, detail = verdict_of(case)
        try:
            seconds = float(case.get("time", "0"))
        except ValueError:
            seconds = 0.0
        old = results.get(key)
        if old is not None:
            seconds += old[1]
            if RANK[old[0]] > RANK[verdict]:
                verdict, detail = old[0], old[2]
        results[key] = (verdict, seconds, detail)
    return results


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: verdicts.py XML NOTE < CASES")
    results = read_results(sys.argv[1])
    note = sys.argv[2]
    for node_id in sys.stdin.read().split("\n"):
        if not node_id.strip():
            continue
        verdict, seconds, detail = results.get(junit_key(node_id), ("FAIL", 0.0, note))
        detail = detail.replace("\t", " ")
        print(f"{verdict}\t{seconds:.1f}\t{node_id}\t{detail}")


if __name__ == "__main__":
    main()
