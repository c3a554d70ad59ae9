from pretrain.run import entry

entry()
