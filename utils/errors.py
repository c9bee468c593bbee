class UserError(Exception):
    """A problem the user can fix (bad option, missing data, wrong checkpoint).

    main.py prints these as one clear message and exits with status 2, no traceback.
    """
