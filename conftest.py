# Present so pytest puts this checkout first on sys.path: tests always import the
# nanoresume beside them, even where another copy is installed.
