"""The package's layering, read from the import statements of its source files.

- no import cycle among seg's modules (module-level imports);
- the data layer (seg/data) needs nothing from the rest but the shared rules (seg.classes,
  seg.preprocessing);
- library code never imports the configs folder, the benchmarks or the tests;
- nothing outside seg/data imports TensorFlow at module level.
"""

import ast
import os

from helpers import ROOT

SEG = os.path.join(ROOT, 'seg')


def _modules():
  """{module name: path} of every module in seg/."""
  found = {}
  for folder, _, files in os.walk(SEG):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        found['.'.join(parts)] = path
  return found


def _imports(path, top_level_only):
  """Names imported by a file: module level only, or everywhere (inside functions too)."""
  tree = ast.parse(open(path).read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  names = []
  for node in nodes:
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.append(node.module)
      names += [f'{node.module}.{alias.name}' for alias in node.names]
  return names


def _seg_edges(modules, top_level_only=True):
  edges = {}
  for name, path in modules.items():
    edges[name] = {m for m in _imports(path, top_level_only) if m in modules and m != name}
  return edges


def test_the_module_graph_has_no_cycle():
  modules = _modules()
  assert len(modules) > 40
  edges = _seg_edges(modules)
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in edges[node]:
      if state.get(nxt) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack + [node, nxt]))
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = 'done'

  for module in sorted(modules):
    if module not in state:
      visit(module, [])


def test_the_data_layer_needs_only_the_shared_rules():
  modules = _modules()
  allowed = ('seg.data', 'seg.classes', 'seg.preprocessing')
  for name, path in modules.items():
    if name.startswith('seg.data'):
      for imported in _imports(path, top_level_only=False):
        if imported.startswith('seg'):
          assert imported.startswith(allowed), f'{name} imports {imported}'


def test_library_code_imports_no_configs_benchmarks_or_tests_and_no_tensorflow_outside_data():
  for name, path in _modules().items():
    for imported in _imports(path, top_level_only=False):
      root = imported.split('.')[0]
      assert root not in ('experiments', 'benchmarks', 'tests', 'helpers'), \
          f'{name} imports {imported}'
    if not name.startswith('seg.data'):
      top = {m.split('.')[0] for m in _imports(path, top_level_only=True)}
      assert not top & {'tensorflow', 'tensorflow_datasets'}, name
