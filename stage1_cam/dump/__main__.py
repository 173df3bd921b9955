"""``python -m stage1_cam.dump``: runs :func:`stage1_cam.dump.main` (see :mod:`stage1_cam.dump.cli`)."""

if __name__ == "__main__":  # as the package's function, whose module logger is named after it (not "__main__")
    from stage1_cam.dump import main as package_main

    raise SystemExit(package_main())
