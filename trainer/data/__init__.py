"""Data: the Tiny ImageNet reader, the synthetic writer, the downloader, the tf.data pipeline."""
