"""One module per node role of a tower; each has install(), configure() and activate() stages."""
