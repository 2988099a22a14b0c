#!/usr/bin/env python3
"""Prints the import cycles between the crate's modules.

Reads every file under src/, resolves each `use` tree and each inline `crate::`/`super::`
path to the module it names, and prints the strongly connected components (more than one
module) of the graph at depth 1 (top-level modules) and at depth 2 (the files inside one
top-level module). Test-only code (`#[cfg(test)]` modules and the files they load) is left
out unless `--tests` is given. Exit code 1 when there is a cycle.

    python3 scripts/module_cycles.py [--tests] [--edges MODULE]
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_path(rel):
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments_and_strings(text):
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = '"' + hashes
            j = text.find(end, i + 2 + len(hashes))
            out.append('""')
            i = n if j < 0 else j + len(end)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(text):
    """Removes `#[cfg(test)] mod x { ... }` blocks and `#[cfg(test)] mod x;` lines."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*([{;])", text):
        if m.start() < pos:
            continue
        out.append(text[pos:m.start()])
        if m.group(1) == ";":
            pos = m.end()
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        pos = j
    out.append(text[pos:])
    return "".join(out)


def test_only_files(files):
    """Files loaded by a `#[cfg(test)] mod x;` declaration, and everything below them."""
    test_mods = set()
    for rel, text in files.items():
        here = module_path(rel)
        for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text):
            test_mods.add(here + (m.group(1),))
    return {rel for rel in files if any(module_path(rel)[: len(t)] == t for t in test_mods)}


def use_trees(text):
    """Yields the full paths of every `use` declaration, its braces expanded."""
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        yield from expand(re.sub(r"\s+", "", m.group(1)))


def expand(tree):
    depth = 0
    for i, c in enumerate(tree):
        if c == "{":
            if depth == 0:
                prefix, inner = tree[:i], tree[i + 1 : tree.rindex("}")]
                for part in split_top(inner):
                    if part == "self":
                        yield prefix.rstrip(":")
                    else:
                        for sub in expand(part):
                            yield prefix + sub
                return
            depth += 1
        elif c == "}":
            depth -= 1
    yield re.sub(r"\bas\w+$", "", tree.split(" as ")[0])


def split_top(s):
    parts, depth, cur = [], 0, ""
    for c in s:
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        cur += c
    if cur:
        parts.append(cur)
    return [p for p in parts if p]


def resolve(path, here, modules):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    base = list(here)
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] in ("super", "self"):
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    elif segs[0] == "computetower":
        base, segs = [], segs[1:]
    else:
        # A path relative to the current module (a child module) or an external crate.
        if tuple(base + segs[:1]) not in modules:
            return None
    full = base + segs
    best = None
    for k in range(1, len(full) + 1):
        if tuple(full[:k]) in modules:
            best = tuple(full[:k])
    return best


def main():
    include_tests = "--tests" in sys.argv
    edges_of = sys.argv[sys.argv.index("--edges") + 1] if "--edges" in sys.argv else None
    files = {}
    for root, _, names in os.walk(SRC):
        for name in names:
            if name.endswith(".rs"):
                full = os.path.join(root, name)
                with open(full, encoding="utf-8") as f:
                    files[os.path.relpath(full, SRC)] = f.read()
    skip = set() if include_tests else test_only_files(files)
    modules = {module_path(rel) for rel in files}
    deps = {}
    for rel, text in files.items():
        if rel in skip or rel == "main.rs":
            continue
        here = module_path(rel)
        code = strip_comments_and_strings(text)
        if not include_tests:
            code = drop_test_modules(code)
        paths = set(use_trees(code))
        paths |= set(m.group(0) for m in re.finditer(r"\b(?:crate|super)(?:::\w+)+", code))
        for p in paths:
            target = resolve(p, here, modules)
            if target and target != here:
                deps.setdefault(here, set()).add(target)
    found = False
    for depth in (1, 2):
        graph = {}
        for src, targets in deps.items():
            a = src[:depth]
            for t in targets:
                b = t[:depth]
                if a == b or len(a) < depth or len(b) < depth:
                    continue
                if depth == 2 and a[0] != b[0]:
                    continue
                graph.setdefault(a, set()).add(b)
        for comp in sccs(graph):
            if len(comp) > 1:
                found = True
                names = sorted("::".join(c) for c in comp)
                print(f"depth {depth} cycle: {' <-> '.join(names)}")
                for a in sorted(comp):
                    for b in sorted(graph.get(a, ())):
                        if b in comp:
                            print(f"    {'::'.join(a)} -> {'::'.join(b)}")
    if edges_of:
        want = tuple(edges_of.split("::"))
        for src, targets in sorted(deps.items()):
            for t in sorted(targets):
                if src[: len(want)] == want and t[: len(want)] != want:
                    print(f"{'::'.join(src)} -> {'::'.join(t)}")
    if not found:
        print("no import cycles")
    return 1 if found else 0


def sccs(graph):
    """Tarjan's algorithm, iteratively."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    nodes = set(graph) | {b for bs in graph.values() for b in bs}
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                out.append(comp)
    return out


if __name__ == "__main__":
    sys.exit(main())
