"""The tests' fixtures, registered as plugins for every test module: none
imports a fixture by hand. tests/ is a package, so they are named from the
top of the repository (pytest puts it on sys.path) whatever the directory
pytest runs from.

- _instances: a `tfem up` per test (instance_factory, instance, client);
- _proc_tools: client processes, servers started by hand, `tfem up` with its
  log in a file (workers, steps_workers, servers, up_factory, small_disk);
- _c_programs: the C programs built against libtfem (programs);
- _nodes: simulated nodes, each in its own network, IPC, UTS and mount
  namespaces, or on 127.0.0.1 where those cannot be made (nodes).
"""

pytest_plugins = ["tests._instances", "tests._proc_tools", "tests._c_programs", "tests._nodes"]
