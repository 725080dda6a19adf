"""Images and datasets: safe decoding (images), folder/CSV indexing, folds and fingerprints (index), the decode-once cache (cache), and what feeds training (sources). Imports only rockcls.core."""
