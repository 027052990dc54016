"""``edged bench``: time a bundle's runtime call in-process (``local``) or load-test a
running daemon over HTTP (``load``) or MQTT (``mqtt``). No printing here: the command
line in ``edged.cli.bench`` renders the dictionaries these modules return."""
