"""The cancelkit demo: a search box whose superseded, stopped and abandoned work stops.

Run it with ``python -m demo`` (or ``python -m nox -s demo``) and open the address it prints.
The application is built by :func:`demo.app.create_app`.
"""
