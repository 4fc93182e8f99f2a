"""Stage configs: each file's get_config(arg) returns one run's ConfigDict."""
