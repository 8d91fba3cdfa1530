"""PEFT methods: each is a function model -> model that leaves exactly its own parameters trainable."""
