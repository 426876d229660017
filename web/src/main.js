// Entry point of the dashboard bundle (esbuild: build.mjs). The CSS imports
// are collected by esbuild into app.css next to app.js; xterm's own sheet
// comes first so ours can adjust it.

import '@xterm/xterm/css/xterm.css';
import './style.css';
import { html } from 'htm/preact';
import { render } from 'preact';
import { App } from './app.js';

render(html`<${App} />`, document.getElementById('app'));
