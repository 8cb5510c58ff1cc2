"""One child script per engine, each run in its own process (so its peak RSS is its own) by file
path, with the Python that has the engine installed. Each reads a Spec (JSON file, argv[1]) and
prints one JSON line (_child.report)."""
