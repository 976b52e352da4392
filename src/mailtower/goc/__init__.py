"""The global operations centre: the SQL sync with every tower (it also runs on each tower's SQL
primary) and VirusEye."""
